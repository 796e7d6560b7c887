"""The training algorithm: losses, objectives, the step, and the policy under each strategy (DDP, FSDP2,
LoRA) with its export. torch only: no Ray, no I/O beyond the policy's own checkpoint files."""
