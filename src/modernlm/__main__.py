"""`python -m modernlm ...` and `torchrun -m modernlm ...` enter here."""

from modernlm.cli import main

if __name__ == "__main__":
    main()
