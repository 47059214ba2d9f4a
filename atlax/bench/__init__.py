"""`python -m atlax.bench`: Atlax vs `ssh -R` vs direct, side by side, on 127.0.0.1."""
