"""The attention/FFN decode pipeline on green-context SM partitions; the runner uses it through DecodePipeline."""
