"""What finetune.py fine-tunes: arch, mode, dataset, model and policy, from its flags, the
strategy and any --resume checkpoint (refused early, as one UserError, when underdetermined)."""
import logging
from dataclasses import dataclass, field

from lib.quantize.options import LINEAR_ONLY, QuantOptions, prepare_model
from lib.quantize.options import resolve as resolve_quant_options
from lib.quantize.linear import DEFAULT_KL_MAX_BIT
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers
from lib.utils.data_utils import list_datasets
from lib.utils.recorded import pretrained_record, settle
from lib.utils.schema import INPUT_SIZES, MAX_CLASSES, MAX_WIDTH_MULT, is_int, is_real, shown
from lib.utils.run_utils import memory_format, model_kwargs_for
from lib.utils.strategy import list_presets, load_strategy, validate_strategy
from models import default_pretrained_path, float_twin, get_model, list_models

log = logging.getLogger("finetune")

DEFAULT_ARCH = {"kmeans": "mobilenetv2", "linear": "qmobilenetv2"}


@dataclass
class Setup:
    """What is fine-tuned: resolved from the flags, the strategy and any --resume checkpoint."""
    arch: str
    mode: str                   # 'kmeans' or 'linear'
    dataset: str
    model_kwargs: dict
    strategy: dict              # as loaded; validated once the model exists
    ckpt: dict = None           # a finetune.py checkpoint being resumed or evaluated
    foreign: dict = None        # other weights to evaluate (-e --resume of e.g. a released file)
    layer_names: list = field(default_factory=list)
    options: QuantOptions = QuantOptions()   # linear mode's quantizer options


def _arch_for_mode(arch, mode):
    """Linear mode needs the Q twin of a float arch; K-Means mode uses the float twin."""
    if mode == "linear" and not arch.startswith("q") and "q" + arch in list_models():
        log.info("linear mode: using '%s' (the quantized twin of '%s')", "q" + arch, arch)
        return "q" + arch
    if mode == "kmeans" and float_twin(arch) != arch:
        log.info("K-Means mode: using '%s' (the float twin of '%s')", float_twin(arch), arch)
        return float_twin(arch)
    return arch


CKPT_EXPECTED = "expected a checkpoint written by finetune.py"
MAX_INT = 1 << 62   # counts past this are no run's (and overflow torch's int64)


def _percent(value):
    return is_real(value, 0, 100)


# field -> (check, what may stand in for a value: None (nothing), "absent" (the key may be
# missing) or "null" (missing or null)); what a checkpoint written by finetune.py holds
_CKPT_FIELDS = {
    "mode": (lambda v: isinstance(v, str) and v in ("kmeans", "linear"), None),
    "arch": (lambda v: isinstance(v, str), None),
    "epoch": (lambda v: is_int(v, 0, MAX_INT), None),
    "policy": (lambda v: isinstance(v, dict) and isinstance(v.get("strategy"), list), None),
    "acc": (_percent, "absent"),
    "best_acc": (_percent, "absent"),
    "dataset": (lambda v: isinstance(v, str), "null"),
    "fp32_top1": (_percent, "null"),
    "quant_top1": (_percent, "null"),
    "kl_max_bit": (lambda v: is_int(v, 0, 8), "null"),
    "args": (lambda v: isinstance(v, dict) and (v.get("data") is None or isinstance(
        v["data"], str)) and (v.get("train_subset") is None
                              or is_int(v["train_subset"], 1, MAX_INT)), "null"),
}


def _model_kwargs_ok(kwargs):
    width = kwargs.get("width_mult") if isinstance(kwargs, dict) else None
    return (isinstance(kwargs, dict) and set(kwargs) <= {"num_classes", "input_size", "width_mult"}
            and is_int(kwargs.get("num_classes"), 1, MAX_CLASSES)
            and (kwargs.get("input_size") is None or is_int(kwargs["input_size"], *INPUT_SIZES))
            and (width is None or (is_real(width) and 0 < width <= MAX_WIDTH_MULT)))


def check_finetune_checkpoint(path, ckpt, evaluate):
    """UserError unless ``ckpt`` has the fields of a finetune.py checkpoint, well typed.

    Checked before any model is built, so an edited or older file is a one-line error
    naming the field, not a KeyError or TypeError deep in model construction, in logging,
    or after a trained epoch (a best_acc that is not a number).
    """
    def bad(field, value):
        raise UserError(f"--resume '{path}': '{field}' is {shown(value)}; {CKPT_EXPECTED}")
    for key, (ok, empty) in _CKPT_FIELDS.items():
        if key not in ckpt and empty is not None:
            continue
        if not (ok(ckpt.get(key)) or (empty == "null" and ckpt.get(key) is None)):
            bad(key, ckpt.get(key))
    if not _model_kwargs_ok(ckpt.get("model_kwargs")):
        bad("model_kwargs", ckpt.get("model_kwargs"))
    codebooks = ckpt.get("codebooks")
    if codebooks is not None and not (isinstance(codebooks, dict) and all(
            isinstance(c, dict) for c in codebooks.values())):
        bad("codebooks", type(codebooks).__name__ if not isinstance(codebooks, dict)
            else "a dict with non-dict entries")
    if not isinstance(ckpt.get("state_dict"), dict):
        bad("state_dict", type(ckpt.get("state_dict")).__name__)
    if not evaluate and not isinstance(ckpt.get("optimizer"), dict):
        raise UserError(f"--resume '{path}' holds no optimizer state, so training cannot "
                        f"continue from it; {CKPT_EXPECTED}, or -e to evaluate it")


def setup_from_checkpoint(args, ckpt):
    check_finetune_checkpoint(args.resume, ckpt, args.evaluate)
    mode = ckpt["mode"]
    for key in ("width_mult", "input_size"):   # the checkpoint's model is the one built
        settle(f"--{key}", getattr(args, key), ckpt["model_kwargs"].get(key),
               f"--resume '{args.resume}'")
    if args.linear_quantization is not None and args.linear_quantization != (mode == "linear"):
        raise UserError(f"--resume '{args.resume}' holds a {mode}-mode model; expected "
                        f"{'no ' if mode == 'kmeans' else ''}--linear_quantization")
    if args.strategy and load_strategy(args.strategy)["strategy"] != ckpt["policy"]["strategy"]:
        log.warning("--strategy differs from the policy recorded in %s; using the recorded one",
                    args.resume)
    dataset = args.data_name or ckpt.get("dataset") or "mnist5k"
    # the data flags default to the run's own, so -e --resume reproduces its accuracy
    saved = ckpt.get("args") or {}
    for key in ("data", "train_subset"):
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key))
    settle_kl_max_bit(args, ckpt.get("kl_max_bit"), f"--resume '{args.resume}'")
    return Setup(ckpt["arch"], mode, dataset, ckpt["model_kwargs"], ckpt["policy"], ckpt=ckpt)


def resolve_setup(args):
    """Arch, mode, dataset, model kwargs and policy of this run (UserError if underdetermined)."""
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and isinstance(ckpt, dict) and "policy" in ckpt:
        return setup_from_checkpoint(args, ckpt)
    if ckpt is not None and not args.evaluate:
        raise UserError(f"--resume '{args.resume}' was not written by finetune.py (it records no "
                        "policy); expected a finetune.py checkpoint, or start from other weights "
                        "with --pretrained_path")
    if not args.strategy and ckpt is not None:
        raise UserError(f"--resume '{args.resume}' records no policy (not written by "
                        "finetune.py?); expected --strategy PATH|PRESET to evaluate its weights "
                        "with, or a finetune.py checkpoint")
    if not args.strategy:
        raise UserError("no policy to fine-tune; expected --strategy PATH|PRESET (presets: "
                        f"{', '.join(list_presets())}) or --resume of a finetune.py checkpoint")
    strategy = load_strategy(args.strategy)
    if args.linear_quantization is None:
        mode = strategy["mode"]
    else:
        mode = "linear" if args.linear_quantization else "kmeans"
    src = f"the strategy '{strategy['source']}'"
    arch = settle("--arch", args.arch, strategy.get("arch"), src, same=_same_arch)
    arch = _arch_for_mode(arch or DEFAULT_ARCH[mode], mode)
    dataset, kwargs = settle_model_settings(args, arch, strategy, src)
    settle_kl_max_bit(args, strategy.get("kl_max_bit"), src)
    return Setup(arch, mode, dataset, kwargs, strategy, foreign=ckpt)


def settle_kl_max_bit(args, recorded, source):
    """--kl_max_bit when not given: the rule the search calibrated with (its strategy.json, or
    the resumed checkpoint's), else DEFAULT_KL_MAX_BIT; a given flag wins (a resumed
    checkpoint's stored ranges still stand, lib.finetune.quantized)."""
    if args.kl_max_bit is not None:
        return
    args.kl_max_bit = DEFAULT_KL_MAX_BIT if recorded is None else recorded
    if recorded is not None:
        log.info("--kl_max_bit %d (from %s)", recorded, source)


def _same_arch(a, b):
    return float_twin(a) == float_twin(b)


def settle_model_settings(args, arch, strategy, src):
    """(dataset, model kwargs) from the flags, the strategy and the pretrained checkpoint.

    Each setting comes from its flag, else the strategy, else the checkpoint pretrain.py
    wrote, else the dataset's default; any two that disagree are a UserError (docs/design.md,
    "source of truth"), except --data_name against the strategy: a policy may be fine-tuned
    on another dataset than its search's (released: searched on imagenet100, fine-tuned on
    imagenet). An older strategy without input_size is refused only where the dataset's
    default would be a guess: an ImageFolder with nothing else recording a size.
    """
    dataset = args.data_name or strategy.get("dataset")
    width = settle("--width_mult", args.width_mult, strategy.get("width_mult"), src)
    size = settle("--input_size", args.input_size, strategy.get("input_size"), src)
    record, weights = {}, None
    if args.pretrained:   # --no-pretrained: no weights, so nothing of theirs to agree with
        path = args.pretrained_path or default_pretrained_path(arch, dataset or "mnist5k")
        # torchvision's weights (--weights NAME) record nothing; a local file there is not used
        record = {} if getattr(args, "weights", None) else pretrained_record(path)
        weights = f"the pretrained checkpoint '{path}'"
    settle("--arch", arch, record.get("arch"), weights, same=_same_arch)
    dataset = settle("the dataset", dataset, record.get("dataset"), weights) or "mnist5k"
    width = settle("the width (--width_mult)", width, record.get("width_mult"), weights)
    size = settle("the input size (--input_size)", size, record.get("input_size"), weights)
    if size is None and "arch" in strategy and dataset not in list_datasets():
        raise UserError(f"the strategy '{strategy['source']}' records no input_size (an older "
                        f"file) and ImageFolder '{dataset}' has no standard size; expected "
                        "--input_size of its search")
    kwargs = model_kwargs_for(arch, dataset, args.data, width, size)
    settle(f"the number of classes of {dataset}", kwargs["num_classes"],
           record.get("num_classes"), weights)
    return dataset, kwargs


def build_model(setup, args, device):
    """The model of ``setup`` with its policy validated against the model's layers."""
    linear = setup.mode == "linear"
    # linear mode: a Q twin as is, any other model swapped to QConv2d/QLinear
    model = memory_format(get_model(setup.arch, linear=linear, **setup.model_kwargs).to(device),
                          args.channels_last)
    names = [name for name, _ in quantizable_layers(model, linear=linear)]
    if not names:
        raise UserError(f"arch '{setup.arch}' has no Conv2d/Linear layers to quantize; expected "
                        "a CNN classifier")
    try:
        setup.strategy = validate_strategy(setup.strategy, names, setup.mode, args.min_bit,
                                           args.max_bit)
    except UserError as exc:
        if setup.ckpt is None:
            raise
        raise UserError(f"--resume '{args.resume}': its 'policy' does not fit: {exc}") from None
    setup.layer_names = names
    setup.options = quant_options_of(setup, args)
    if setup.options.is_default():
        setup.strategy.pop("quant_options", None)
    else:   # the checkpoints' policy records them: a resume or an export builds the same model
        setup.strategy["quant_options"] = setup.options.record()
    if setup.ckpt is not None:   # its state_dict is that of the prepared model
        prepare_model(model, setup.options)
    return model


def quant_options_of(setup, args):
    """The run's quantizer options: the strategy's (or resumed checkpoint's) record, each
    overridden by its flag when given; a resumed model keeps the ones it was prepared with."""
    record, where = setup.strategy.get("quant_options"), "the strategy's 'quant_options'"
    if setup.ckpt is not None:
        where = f"--resume '{args.resume}': its policy's 'quant_options'"
    options = resolve_quant_options(args, record, where)
    if setup.ckpt is not None:
        recorded = QuantOptions.from_record(record, where)
        if options != recorded:
            log.warning("quantizer option flags ignored: %s holds a model prepared with %s",
                        args.resume, recorded.record())
        return recorded
    if setup.mode != "linear" and not options.is_default():
        raise UserError(f"{LINEAR_ONLY}; expected a linear-mode strategy with them")
    return options
