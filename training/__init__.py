"""The product's offline half, what every user runs: data sources (`data`), decoder fitting
(`fit`, `checkpoint`), threshold calibration (`calibrate`), export of the one-graph bundle
(`export`), scoring with a torch detector or a bundle (`scoring`, `offline_score`) and the `dede`
command line (`cli`). Imports `models` and the service's torch-free parts; never the lab."""
