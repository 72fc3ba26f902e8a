"""scdino.training: DINO self-supervised training of channel-adapted ViTs on N-channel crops (``scdino-train``).

Single process: ``scdino-train --data plate.zarr --out run/``; many: ``torchrun --nproc-per-node N -m scdino.training
--data ... --out ...`` (DDP; NCCL on GPUs, gloo on CPU).
"""
