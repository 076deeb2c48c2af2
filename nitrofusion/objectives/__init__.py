"""Training objectives: the adversarial losses and NitroFusion's multi-head judgement."""
