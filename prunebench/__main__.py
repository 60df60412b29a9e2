"""`python -m prunebench ...`: the same command line as `prunebench ...`, so launchers that start a
module (`torchrun -m prunebench run ...`, `accelerate launch -m prunebench run ...`) run it."""

from prunebench.cli import app

if __name__ == "__main__":
    app(prog_name="prunebench")
