"""Executes every notebook in notebooks/ headless (nbclient), as they are committed: their parameter cells run a
tiny random model offline. Outputs go to a temporary copy, never into the repository. One line per notebook; the
first failing cell's error and a non-zero exit status on any failure.

    python scripts/run_notebooks.py [notebooks/01_quickstart.ipynb ...] [--timeout 600] [--keep DIR] [--jobs N]

Each kernel gets a temporary directory of its own as $TMPDIR (the notebooks' work directories go there), removed
when the notebook ends. With --jobs N, N notebooks run at once: a kernel compiles on one core most of the time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_name() -> str:
    """A kernelspec for this interpreter (installed into its environment once), so the notebooks import the same
    packages as the caller."""
    from jupyter_client.kernelspec import KernelSpecManager

    name = "gemma4-jax-" + os.path.basename(sys.prefix.rstrip("/")).lower()
    specs = KernelSpecManager().find_kernel_specs()
    if name not in specs:
        from ipykernel.kernelspec import install

        install(kernel_name=name, display_name=f"Python ({sys.prefix})", prefix=sys.prefix)
    return name


def run(path: str, kernel: str, timeout: int, keep: str | None = None) -> tuple[bool, float, str]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nb-") as scratch:
        # The notebook's own directory is its working directory (it finds the repository from there); the copy
        # with outputs is written to scratch and dropped. What the kernel process writes to its own stderr (native
        # runtimes' logs: llama.cpp, LiteRT) goes to a file, shown only when the notebook fails.
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": os.path.dirname(path)}}
        )
        log_path = os.path.join(scratch, "kernel.log")
        tmp = os.path.join(scratch, "tmp")
        os.mkdir(tmp)
        with open(log_path, "wb") as log:
            try:
                client.execute(stderr=log, env={**os.environ, "TMPDIR": tmp})
                error = ""
            except CellExecutionError as e:
                error = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the traceback without terminal colours
            except Exception as e:  # a dead kernel, a cell past its timeout
                error = f"{type(e).__name__}: {e}"
            finally:
                nbformat.write(notebook, os.path.join(keep or scratch, os.path.basename(path)))
        if error:
            with open(log_path, errors="replace") as log:
                tail = log.read()[-2000:]
            if tail.strip():
                error += "\n--- kernel stderr (last lines) ---\n" + tail
    return not error, time.perf_counter() - start, error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="default: notebooks/*.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--keep", metavar="DIR", help="write the executed notebooks (with outputs) into DIR")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1)")
    args = parser.parse_args(argv)
    paths = [os.path.abspath(p) for p in args.notebooks] or sorted(
        glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))
    )
    if not paths:
        print("run_notebooks: no notebooks found", file=sys.stderr)
        return 1
    kernel = kernel_name()
    failed = []
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each kernel is a process of its own
        runs = {pool.submit(run, path, kernel, args.timeout, args.keep): path for path in paths}
        for future in concurrent.futures.as_completed(runs):  # a line as each one ends
            ok, seconds, error = future.result()
            name = os.path.relpath(runs[future], ROOT)
            if ok:
                print(f"executed {name} in {seconds:.0f} s", flush=True)
            else:
                failed.append(name)
                print(f"FAILED {name} after {seconds:.0f} s:\n{error[-5000:]}", flush=True)
    total = time.perf_counter() - started
    print(f"notebooks: {len(paths) - len(failed)} of {len(paths)} executed without error in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
