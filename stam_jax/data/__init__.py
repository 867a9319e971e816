"""Video data: folder listing, official clip sampling and transform, parallel decoding."""
