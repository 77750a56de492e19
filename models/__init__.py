"""The contract between the halves: the bundle's manifest schema and its read/verify/write
(`bundle.py`, torch-free: the only module the online half imports), and the torch modules both
halves agree on (encoder architectures and loaders, the DeDe decoder, the fused detector graph).
Imports nothing else of this project."""
