"""The flags that define a search, read off the config dataclasses.

A resumed search must be the search it was: every flag that changes the environment,
the agent or the short fine-tune has to agree with the saved one. Those flags are the
fields of :class:`SearchConfig`, :class:`lib.env.EnvConfig`, :class:`lib.rl.DDPGConfig`
and :class:`lib.env.FinetuneConfig` that are also command-line flags, so a new setting
joins the check by being added to its dataclass. A field marked ``resume=False`` in its
metadata may change between runs (it changes what is shown, not what is computed).
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from lib.env import EnvConfig, FinetuneConfig
from lib.rl import DDPGConfig


def added_later(default):
    """A field saved states may lack: they were written before it existed and ran with ``default``."""
    return field(default=default, metadata={"added_later": True})


@dataclass
class SearchConfig:
    """What is searched, on which data and by which method (the flags no other config holds)."""
    arch: str = "mobilenetv2"
    dataset: str = "imagenet"
    width_mult: Optional[float] = None
    linear_quantization: bool = False
    cost: Optional[str] = None
    hardware: str = "bismo_cloud"
    cost_batch: int = 16
    train_size: int = 20000
    val_size: int = 10000
    data_bsize: int = 256
    is_pruned: bool = False
    free_high_bit: bool = True
    reuse_codebooks: bool = added_later(False)
    method: str = "ddpg"
    sensitivity: str = "loss"
    n_update: int = 1
    per_channel: bool = added_later(False)
    weight_clip: str = added_later("max")
    fold_bn: bool = added_later(False)
    bias_correction: bool = added_later(False)
    kl_max_bit: int = added_later(0)
    refine: int = added_later(0)
    bn_reestimate: int = added_later(0)


CONFIGS = (SearchConfig, EnvConfig, DDPGConfig, FinetuneConfig)


def resume_fields(flags):
    """The dataclass fields that are flags in ``flags`` (a parsed namespace) and define the search."""
    names = vars(flags)
    return [f for cls in CONFIGS for f in fields(cls)
            if f.name in names and f.metadata.get("resume", True)]


def resume_defaults(flags):
    """{flag: value} that a state saved before the flag existed ran with."""
    return {f.name: f.default for f in resume_fields(flags) if f.metadata.get("added_later")}


def config_from_args(cls, args, **extra):
    """An instance of the dataclass ``cls`` with every field ``args`` has a flag for, plus ``extra``."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**dict(values, **extra))
