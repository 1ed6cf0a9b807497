"""The most confidently wrong images of an evaluation, kept while it runs (for mistakes.png)."""
import heapq

import numpy as np


class ConfidentMistakes(object):
    """The `limit` wrong images with the highest top-1 probability seen so far (earlier images win ties).

    floor: the confidence a new mistake must exceed to be kept (-1 while fewer than `limit` are kept, 1 when limit
    is 0); the evaluation graph uses it to fetch the images of a batch's candidates only."""

    def __init__(self, limit):
        self.limit = int(limit)
        self._heap = []  # (confidence, -index, index, image): the least confident kept mistake first

    @property
    def floor(self):
        if len(self._heap) < self.limit:
            return -1.0
        return self._heap[0][0] if self._heap else 1.0

    def add(self, indices, confidences, images):
        """indices: the images' positions in the evaluation; confidences: their top-1 probabilities."""
        for index, confidence, image in zip(indices, confidences, images):
            item = (float(confidence), -int(index), int(index), image)
            if len(self._heap) < self.limit:
                heapq.heappush(self._heap, item)
            elif item[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, item)

    def worst(self):
        """(indices [K], images [K, ...]) of the kept mistakes, the most confident first."""
        kept = sorted(self._heap, key=lambda item: item[:2], reverse=True)
        return np.asarray([item[2] for item in kept], np.int64), np.asarray([item[3] for item in kept])
