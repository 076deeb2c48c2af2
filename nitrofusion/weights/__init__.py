"""Operations on UNet weights: transfer of a distillation delta, LoRA export."""
