"""``imgfs dedup``: find guest blocks that several images of a directory hold, and store them
once (a shared qcow2 base image, or shared host extents through FIDEDUPERANGE)."""
