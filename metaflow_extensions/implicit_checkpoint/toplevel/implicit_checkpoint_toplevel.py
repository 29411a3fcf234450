# Loaded by `import metaflow`: every public name here becomes `metaflow.<name>`, and the two
# dunder names below show in Metaflow's banner as "implicit-checkpoint(<version>)".
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.client import (  # noqa: F401
    Checkpoint,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.manifest import (  # noqa: F401
    CheckpointArtifact,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.version import (
    __version__,
)
from metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.files import (  # noqa: F401
    Directory,
)

__mf_extensions__ = "implicit-checkpoint"
