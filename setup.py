"""Per-group covariance, correlation and PCA of Parquet data on Beam and TF."""

from setuptools import find_packages, setup

setup(
    name="feature-stage",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=find_packages(
        include=["pipeline", "pipeline.*", "transforms", "transforms.*"]
    ),
    install_requires=[
        "apache-beam>=2.60,<2.78",
        "tensorflow-cpu>=2.16,<2.22",
        "numpy>=1.26,<3",
        "pyarrow>=14,<26",
        "pyyaml>=6,<7",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pandas>=2,<4",
            "scikit-learn>=1.4,<2",
            # The report's tests draw real figures.
            "matplotlib>=3.7,<4",
        ],
        # Beam's filesystems and runners for the clouds; nothing else changes.
        "gcp": ["apache-beam[gcp]>=2.60,<2.78"],
        "aws": ["apache-beam[aws]>=2.60,<2.78"],
        "report": ["matplotlib>=3.7,<4"],
    },
)
