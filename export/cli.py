"""`gemma4-jax export gguf|litert`: each format module provides `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import importlib

# format name -> (module, help)
FORMATS = {
    "gguf": ("gemma4_jax.export.gguf", "GGUF file that llama.cpp runs"),
    "litert": ("gemma4_jax.export.litert", "LiteRT .tflite models + .litertlm bundle"),
}


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a checkpoint for another runtime", description=__doc__)
    formats = export.add_subparsers(dest="format", required=True)
    for name, (module_name, help_text) in FORMATS.items():
        parser = formats.add_parser(name, help=help_text, description=help_text)

        def run(args, module_name=module_name):
            return importlib.import_module(module_name).run(args)

        try:
            importlib.import_module(module_name).add_arguments(parser)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real missing dependency inside the module
                raise
            continue
        parser.set_defaults(func=run)
