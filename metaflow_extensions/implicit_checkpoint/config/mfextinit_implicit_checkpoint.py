from metaflow.metaflow_config_funcs import from_conf

# Where checkpoints are stored when @checkpoint(root=...) is not given.
# Set METAFLOW_IMPLICIT_CHECKPOINT_ROOT (or IMPLICIT_CHECKPOINT_ROOT in a Metaflow profile).
IMPLICIT_CHECKPOINT_ROOT = from_conf("IMPLICIT_CHECKPOINT_ROOT")
