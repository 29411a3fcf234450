# Registers @checkpoint with Metaflow. Paths are relative to this `plugins` package.
STEP_DECORATORS_DESC = [
    ("checkpoint", ".implicit_checkpoint.decorator.CheckpointDecorator"),
]
