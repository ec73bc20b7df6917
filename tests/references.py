"""Reference files that nobody on this project wrote, read from the llama-cpp-python sdist.

`scripts/test.sh` downloads `llama_cpp_python-0.3.36.tar.gz` from PyPI into `.cache/sdist/` (it also builds
llama.cpp from it). Its vendored llama.cpp carries Google's Gemma 4 chat templates
(`models/templates/google-gemma-4-31B-it*.jinja`) and the real Gemma 4 vocabulary
(`models/ggml-vocab-gemma-4.gguf` with tokenization test vectors `.inp` / `.out`).
"""

from __future__ import annotations

import functools
import os
import tarfile

SDIST = os.environ.get(
    "GEMMA4_LLAMA_CPP_SDIST",
    os.path.join(os.path.dirname(__file__), "..", ".cache", "sdist", "llama_cpp_python-0.3.36.tar.gz"),
)
_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


@functools.cache
def llama_cpp_file(path: str) -> bytes:
    """A file of the vendored llama.cpp tree, e.g. `models/templates/google-gemma-4-31B-it.jinja`."""
    if not os.path.isfile(SDIST):
        raise FileNotFoundError(
            f"{SDIST} is missing: run scripts/test.sh (it downloads it), or `pip download --no-deps --no-binary "
            ":all: llama-cpp-python==0.3.36 -d .cache/sdist`, or set GEMMA4_LLAMA_CPP_SDIST"
        )
    with tarfile.open(SDIST) as tar:
        return tar.extractfile(_ROOT + path).read()


def gemma4_chat_template(name: str = "google-gemma-4-31B-it.jinja") -> str:
    return llama_cpp_file(f"models/templates/{name}").decode("utf-8")
