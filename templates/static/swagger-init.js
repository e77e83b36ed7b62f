// Starts Swagger UI on this server's OpenAPI document. A file rather than an inline script, so
// that the Content-Security-Policy (scripts from this origin only) holds on the API page too.
"use strict";
(function () {
  const spec = document.currentScript.dataset.spec;
  window.addEventListener("load", function () {
    window.ui = SwaggerUIBundle({
      url: spec,
      dom_id: "#swagger-container",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "BaseLayout",
    });
  });
})();
