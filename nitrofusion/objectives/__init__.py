"""Training objectives on one trainer: NitroFusion (default), DMD2, ADM, and the pre-training
that precedes them (regression or DMDX's adversarial one); the GAN losses and scores they share."""
