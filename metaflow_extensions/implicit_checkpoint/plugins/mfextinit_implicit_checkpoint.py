# Registers @checkpoint and the `checkpoint` command group with Metaflow. Paths are relative
# to this `plugins` package.
STEP_DECORATORS_DESC = [
    ("checkpoint", ".implicit_checkpoint.decorator.CheckpointDecorator"),
]
CLIS_DESC = [
    ("checkpoint", ".implicit_checkpoint.cli.cli"),
]
