"""Entry point: `python train.py [overrides]`. All logic lives in linnaeus.train."""

from linnaeus.train import hydra_entry

if __name__ == "__main__":
    hydra_entry()
