"""The routes around generation: models, health, version, tokenize/detokenize, the OpenAPI document."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import __version__
from ..openai import protocol as P
from ..openai.responses_protocol import ResponsesRequest
from .body import read_json


async def models(request: Request):
    return JSONResponse(request.app.state.server.service.models())


async def model(request: Request):
    return JSONResponse(request.app.state.server.service.model(request.path_params["model_id"]))


async def tokenizer_info(request: Request):
    return JSONResponse(request.app.state.server.service.tokenizer_info())


async def health(request: Request):
    state = request.app.state.server
    if not state.client.alive:
        why = state.client.failure  # NOTE: a lost tensor-parallel rank says which, for the operator
        message = "the engine is not running" + (f" ({why})" if why else "")
        return JSONResponse(P.error_body(message, "server_error", None, "engine_unavailable"), 503)
    if state.shutting_down:
        return JSONResponse(P.error_body("the server is shutting down", "server_error", None, "shutting_down"), 503)
    return JSONResponse({"status": "ok", **state.client.snapshot()})


async def version(request: Request):
    return JSONResponse({"version": __version__})


async def tokenize(request: Request):
    state = request.app.state.server
    return JSONResponse(await state.offload(state.service.tokenize, await read_json(request)))


async def detokenize(request: Request):
    state = request.app.state.server
    return JSONResponse(await state.offload(state.service.detokenize, await read_json(request)))


async def openapi(request: Request):
    return JSONResponse(openapi_document())


def openapi_document() -> dict:
    from pydantic.json_schema import models_json_schema

    models = [P.ChatCompletionRequest, P.CompletionRequest, ResponsesRequest, P.TokenizeRequest, P.DetokenizeRequest]
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")

    def op(name: str, summary: str) -> dict:
        return {
            "post": {
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
                },
                "responses": {
                    "200": {"description": "OK"},
                    "400": {"description": "Invalid request (OpenAI error JSON)"},
                },
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "mistralrs-py", "version": __version__},
        "paths": {
            "/v1/chat/completions": op("ChatCompletionRequest", "Chat completion (OpenAI)"),
            "/v1/completions": op("CompletionRequest", "Text completion (OpenAI)"),
            "/v1/responses": op("ResponsesRequest", "Responses API (OpenAI), stateless"),
            "/tokenize": op("TokenizeRequest", "Tokenize a prompt or messages"),
            "/detokenize": op("DetokenizeRequest", "Detokenize token ids"),
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "OK"}}}},
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "One served model",
                    "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "OK"}, "404": {"description": "No such model"}},
                }
            },
            "/tokenizer_info": {
                "get": {
                    "summary": "The tokenizer's special tokens and template",
                    "responses": {"200": {"description": "OK"}},
                }
            },
            "/health": {
                "get": {
                    "summary": "Engine health",
                    "responses": {"200": {"description": "OK"}, "503": {"description": "Engine down"}},
                }
            },
            "/version": {"get": {"summary": "Server version", "responses": {"200": {"description": "OK"}}}},
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }
