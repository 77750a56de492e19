"""Backdoor attacks on SSL encoders, for the lab: BadEncoder and variants, CTRL, and their triggers."""
