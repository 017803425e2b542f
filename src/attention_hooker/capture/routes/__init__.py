"""The capture routes, one module each: "is this call mine", and the call as an attention map or a refusal."""
