"""Data: corpora and labelled tasks read from local files or `s3://`, prepared once into content-addressed parquet
splits (`corpus`, `labelled`, `formats`), tokenised and packed (`tokenize`), curated (`curation`), generated
(`selfinstruct`) and perturbed (`perturb`)."""
