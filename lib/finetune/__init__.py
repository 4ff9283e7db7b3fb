"""finetune.py as a library: set-up, output folder, the quantized policy and the run.

    setup      what is fine-tuned (flags, strategy, --resume checkpoint) and its model
    outputs    the output-folder policy and the run's files
    quantized  the policy's quantization and the --free_high_bit plumbing
    run        the epoch loop
"""
from .outputs import (CHECKPOINT_PARENT, LOG_COLUMNS, RunOutputs, check_output,
                      default_run_name, lock_output, output_folder)
from .quantized import KMEANS_ITERS, QuantizedPolicy
from .run import Finetune, checkpoint_dict, evaluate_model
from .setup import Setup, build_model, check_finetune_checkpoint, resolve_setup

__all__ = ["CHECKPOINT_PARENT", "LOG_COLUMNS", "RunOutputs", "check_output", "default_run_name",
           "lock_output", "output_folder", "KMEANS_ITERS", "QuantizedPolicy", "Finetune",
           "checkpoint_dict", "evaluate_model", "Setup", "build_model", "check_finetune_checkpoint", "resolve_setup"]
