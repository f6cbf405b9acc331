// Each UTC time on the page also in the viewer's own zone.
document.querySelectorAll("time[datetime]").forEach(function (node) {
  var moment = new Date(node.getAttribute("datetime"));
  if (isNaN(moment)) return;
  var local = document.createElement("span");
  local.className = "local";
  local.textContent = " (" + moment.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"}) + " your time)";
  node.appendChild(local);
});
