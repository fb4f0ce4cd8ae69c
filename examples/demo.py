"""`make demo`: a short GMoE fine-tune of a tiny Llama (built from a config) on a bundled text.

Prints the loss going down and each layer's expert load. Runs in about a minute on 2 CPU cores.
"""
from gmoe.train import main

if __name__ == "__main__":
    main()
