// Each module registers its commands; add a line here for a new group.
import "./directory.ts";
import "./dkim.ts";
