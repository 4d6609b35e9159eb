"""``python -m enclaveml``: the same command line as the ``enclaveml`` script.

Why it exists: a TEE loader such as Gramine starts an ELF interpreter with a fixed, measured
argument list, not a console script, so the deployment manifests run ``python3 -m enclaveml``.
"""

from enclaveml.cli import main

if __name__ == "__main__":
    main()
