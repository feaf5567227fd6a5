"""`peft-ds` as a script path, for launchers that start a file rather than a module (the deepspeed
launcher: its mpich/openmpi runners mishandle --module). Every rank runs:  launcher/train.py train CONFIG ..."""

import sys

from peft_ds.cli import main

if __name__ == "__main__":
    sys.exit(main())
