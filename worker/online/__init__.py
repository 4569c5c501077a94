"""Online learning beside the serving path: scoring every forecast, fine-tuning on a
schedule, and the model store every worker serves from."""
