"""How good and how big: held-out loss, JCommonsenseQA, model card, loss plot, VRAM estimate."""
