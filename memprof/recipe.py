"""Accuracy mode's recipe and pass thresholds (constants only: the command line shows them in --help)."""

DEFAULT_STEPS = 1000  # training steps per configuration
DEFAULT_LR_SGD = 1e-2  # SGD and LARS; the paper sweeps 3e-5..1e-2 when fine-tuning pretrained weights
DEFAULT_LR_ADAPTIVE = 1e-3  # AdamW and LAMB; the paper sweeps 3e-7..1e-4; random init needs more
PROBE_SIZE = 128  # training images whose mean loss is tracked

LEARN_LOSS_DROP = 0.10  # the probe loss must fall by at least this fraction
LEARN_ACC_OVER_CHANCE = 2.0  # held-out accuracy must reach this multiple of chance
CKPT_RTOL, CKPT_ATOL, CKPT_LOSS_STEPS = 1e-5, 1e-7, 3  # gradients and first losses, checkpointing on vs off
EIGHT_BIT_STEPS, EIGHT_BIT_COSINE, EIGHT_BIT_ACC_MARGIN = 50, 0.9, 0.10  # 8-bit vs 32-bit updates and accuracy
CPU_PARAM_LIMIT = 50_000_000  # accuracy mode refuses bigger models on a CPU: hours of training
