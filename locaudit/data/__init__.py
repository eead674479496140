"""TruthfulQA loading and splitting (`truthfulqa`), prompt formats (`formats`) and the example builders
for probes, preference pairs and multiple choice (`examples`)."""
