# Tells Metaflow which module's names to add to `metaflow` (`from metaflow import Checkpoint`).
toplevel = "implicit_checkpoint_toplevel"
