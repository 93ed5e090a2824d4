"""Guard models: the CLIP/SigLIP safety detector (export, concept bank, OT scores, quantization)."""
