"""kombu's file-system transport, with messages written atomically.

The stock transport creates a message file, then locks and fills it; a worker polling
the folder in between moves and reads an empty file, and the JSON error stops the worker
("Unrecoverable error: JSONDecodeError"). Here each message is written under a name the
readers skip (``….msg.part``) and renamed into place once complete. Only the embedded
demo default uses it (``CELERY_BROKER_TRANSPORT``); production runs Redis.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"  # "<…>.<queue>.msg.part": not "<queue>.msg", never read
        try:
            with open(partial, "wb", buffering=0) as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
