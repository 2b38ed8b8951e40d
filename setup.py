from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
extras = {
    "hf": ["datasets>=2.14"],
    "sentencepiece": ["sentencepiece>=0.1.99"],
    "plot": ["matplotlib>=3.6"],
    "tensorboard": ["tensorboard>=2.12"],
    "lightning": ["lightning>=2.2"],  # dni_rnn.lightning; `import dni_rnn` never needs it
}
extras["dev"] = (["pytest>=7"] + extras["hf"] + extras["sentencepiece"] + extras["plot"]
                 + extras["lightning"])

setup(
    name="dni-rnn",
    version="0.1.0",
    description="Truncated BPTT for recurrent networks with synthetic gradients "
    "(Decoupled Neural Interfaces)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=["dni_rnn", "dni_rnn.app", "corpora", "recipes"],
    package_data={"recipes": ["*.toml"]},
    python_requires=">=3.10",
    install_requires=[
        # users bring their own (CUDA) build; CI pins the CPU wheel of 2.13.0
        "torch>=2.2,<3",
        "numpy",
        "tqdm>=4.60",
        "tomli>=2; python_version<'3.11'",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["dni-rnn=dni_rnn.app.cli:main"]},
)
