"""Entry point: `python train.py [overrides]`. All logic lives in linnaeus.train."""

from linnaeus.train import exit_process, hydra_entry

if __name__ == "__main__":
    hydra_entry()
    exit_process()  # a finished run leaves without the interpreter's slow module teardown
