from metaflow.metaflow_config_funcs import from_conf

# Where checkpoints are stored when @checkpoint(root=...) is not given.
# Set METAFLOW_IMPLICIT_CHECKPOINT_ROOT (or IMPLICIT_CHECKPOINT_ROOT in a Metaflow profile).
IMPLICIT_CHECKPOINT_ROOT = from_conf("IMPLICIT_CHECKPOINT_ROOT")
# How long a storage call is retried through transient faults before a save or load fails.
IMPLICIT_CHECKPOINT_RETRY_SECONDS = from_conf("IMPLICIT_CHECKPOINT_RETRY_SECONDS", 60)
# After SIGTERM or a spot-termination notice, how long a @checkpoint step has to save, return
# and flush its pending saves before the task ends anyway (current.checkpoint.preempted).
IMPLICIT_CHECKPOINT_PREEMPT_SECONDS = from_conf("IMPLICIT_CHECKPOINT_PREEMPT_SECONDS", 25)
