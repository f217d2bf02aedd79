from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="citygen",
    version="0.1.0",
    description="City-scale 3D reconstruction and rendering with hash-grid neural fields",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["citygen*", "survey_io*", "cuda_ext*", "viewer*"]),
    # the YAML presets ship inside the package (citygen/config.py reads them with importlib.resources)
    package_data={"cuda_ext": ["csrc/*.h", "csrc/*.cpp", "csrc/*.cu"], "citygen": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        # CPU machines: `pip install torch==2.13.0` first (a small CPU build); GPU machines
        # install a CUDA build of torch first (see README). Any torch >= 2.1 satisfies this.
        "torch>=2.1",
        "numpy>=1.24",
        "pyproj>=3.6",
        "defusedxml>=0.7",  # survey XML (BlocksExchange, DJI XMP) without DTDs or entity expansion
        "rasterio>=1.3",
        "pillow>=10",
        "safetensors>=0.4",
        "tyro>=0.8",
        "rich>=13",
        "pyyaml>=6",
        "pycolmap>=3.10",
        "moderngl>=5.10",
        "laspy>=2.5",
        "shapely>=2.0",  # edit polygons: validity (self-intersection) when an edit is added
        "lazrs>=0.5",  # LAZ compression for laspy
        "glfw>=2.5",  # the viewer's desktop window
        "psutil>=5.9",  # available RAM: the default memory budget of plan / export / train
    ],
    extras_require={
        # pytest-timeout: a hung test fails (with its stack) instead of stalling CI (pyproject.toml)
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.5",
                # the layer contracts in pyproject.toml (tests/test_layers.py runs them); 2.x for acyclic_siblings
                "import-linter>=2.17",
                # its validator checks the COG layout of exported rasters (tests/test_export_windows.py)
                "rio-cogeo>=5"],
        "mesh": ["open3d-cpu>=0.18; platform_machine=='x86_64'", "trimesh>=4"],  # trimesh: glTF export
        "ray": ["ray>=2.9"],
        "nerfstudio": ["nerfstudio>=1.1"],
        # tiny-cuda-nn is not on PyPI: build it from source on a CUDA machine (see README).
        "tcnn": [],
    },
    entry_points={
        "console_scripts": ["citygen=citygen.cli:main"],
        "nerfstudio.method_configs": ["citygen-field=citygen.nerfstudio_plugin:citygen_method"],
    },
)
