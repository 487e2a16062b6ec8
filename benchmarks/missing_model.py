"""How long a model name that is neither an existing folder nor a Hub id takes to be refused.

    python benchmarks/missing_model.py

personalm refuses a local-looking path that does not exist at once (``personalm.models.resolve``), before
transformers could take it for a Hub id and, offline, wait on the network. This prints the time of that
refusal beside transformers' own answer for the same name (the figure once asserted in a test, `< 1 s`).
"""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        fn()
        outcome = "no error"
    except Exception as err:  # noqa: BLE001  (the point is which error, and when)
        outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
    return time.perf_counter() - start, outcome


def main() -> None:
    from transformers import AutoTokenizer

    from personalm.models import resolve

    for name in ("./no/such/model", "no/such/model"):
        ours, said = timed(lambda: resolve(name))
        theirs, they_said = timed(lambda: AutoTokenizer.from_pretrained(name))
        print(f"{name!r}: personalm {ours * 1e3:.2f} ms ({said}); transformers {theirs * 1e3:.0f} ms ({they_said})")


if __name__ == "__main__":
    main()
