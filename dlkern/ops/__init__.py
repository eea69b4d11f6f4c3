"""dlkern.ops: one file per op (or small op family): its torch.library registration, launcher, fake and autograd."""
