"""IA3 (Liu et al., 2022) as a modapt update method: learned per-channel rescaling."""
