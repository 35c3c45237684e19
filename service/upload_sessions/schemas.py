from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["model", "dataset"]
    filename: str = Field(min_length=1, max_length=255)
    size_bytes: int = Field(gt=0, description="the whole file's size; every part but the last is `part_bytes` long")
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="of the whole file: checked at complete")
    part_bytes: int | None = Field(None, gt=0, description="the part size asked for; the server's default when absent")
    name: str | None = Field(None, max_length=255, description="display name, as the `name` form field")
    preprocess: str | None = Field(None, max_length=16 * 1024, description="datasets: JSON, as the `preprocess` form field")
    task: str | None = Field(None, max_length=16 * 1024, description="models: JSON, as the `task` form field")


class UploadComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$",
                               description="of the whole file, when not given at the start (a client hashing while it sends)")


class UploadPartRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    size_bytes: int
    sha256: str


class UploadRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    status: str
    filename: str
    size_bytes: int
    sha256: str | None
    part_bytes: int
    part_count: int
    parts: list[UploadPartRead] = Field(description="the parts received so far, by number: a resume sends the others")
    received_bytes: int
    result_id: str | None = Field(description="the model or dataset made by complete")
    error: dict | None
    created_at: datetime
    expires_at: datetime
