"""Packaging for tf-limaml (the `limaml` command and the `tf_limaml` library)."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

setup(
    name="tf-limaml",
    version="0.1.0",
    description=(
        "Per-member personalization of TensorFlow recommenders by "
        "meta-learning (LiMAML)"
    ),
    long_description=(
        (HERE / "README.md").read_text(encoding="utf-8")
        if (HERE / "README.md").exists()
        else ""
    ),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "tf_limaml",
            "tf_limaml.*",
            "beam_pipelines",
            "beam_pipelines.*",
            "serving",
            "serving.*",
        ]
    ),
    install_requires=[
        "tensorflow>=2.16",
        "tf-keras",
        "tensorflow-recommenders>=0.7.3",
        "numpy",
    ],
    extras_require={
        "beam": ["apache-beam>=2.50", "google-crc32c", "pandas", "pyarrow"],
        # Beam's DaskRunner (experimental) and the dask.distributed it runs on.
        "dask": ["apache-beam[dask]>=2.50"],
        "serving": ["tensorflow-serving-api", "grpcio", "requests"],
        "report": ["matplotlib", "pandas"],
        # The docs site (`make docs` installs these in .venv-docs, pinned).
        "docs": ["mkdocs", "mkdocs-material", "mkdocstrings[python]"],
        # bench/peers.py's JAX and torch peers (`make bench-peers` installs these
        # in .venv-peers, never beside TensorFlow in .venv).
        "peers": ["jax[cpu]", "optax", "torch", "numpy"],
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "nbclient",
            "nbformat",
            "ipykernel",
        ],
    },
    # Every data file the package reads at run time ships in the wheel.
    package_data={
        "serving": ["models.config"],
        "tf_limaml": ["experiments/*.json", "export/*.txt"],
    },
    include_package_data=True,
    entry_points={"console_scripts": ["limaml=tf_limaml.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
