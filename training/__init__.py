"""Training scripts of fewstep's default model: not part of the installed package.

Run from the repository root as modules (`python -m training.train_vae ...`); see README.md.
"""

import os

# GNU OpenMP's default wait policy lets a thread spin at every barrier while it waits for the
# other; on a 2-core machine shared with other work, the partner is often descheduled and the
# spinning eats the step: the U-Net's forward+backward measured 16.4 s with 2 threads spinning
# vs 1.8 s with PASSIVE at the same load (README, "Measured"). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
